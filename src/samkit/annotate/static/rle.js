// COCO RLE in the browser: decode the compressed counts string and paint a mask into RGBA pixels.
// A COCO RLE {size: [h, w], counts} lists run lengths down the columns, starting with a run of 0s.
"use strict";

const RLE = {
  // Compressed counts: 5 data bits per character (offset 48), bit 0x20 = more characters follow,
  // bit 0x10 of the last character = sign; from the third count on, each value is a delta to the count
  // two places back.
  decodeCounts(s) {
    const counts = [];
    let p = 0;
    while (p < s.length) {
      let x = 0;
      let k = 0;
      let more = true;
      while (more) {
        const c = s.charCodeAt(p) - 48;
        x |= (c & 0x1f) << (5 * k);
        more = (c & 0x20) !== 0;
        p++;
        k++;
        if (!more && (c & 0x10)) x |= -1 << (5 * k);
      }
      if (counts.length > 2) x += counts[counts.length - 2];
      counts.push(x);
    }
    return counts;
  },

  counts(rle) {
    return typeof rle.counts === "string" ? RLE.decodeCounts(rle.counts) : rle.counts;
  },

  // Row-major Uint8Array (h * w) of 0/1 from an RLE.
  toBitmap(rle) {
    const [h, w] = rle.size;
    const bits = new Uint8Array(h * w);
    const counts = RLE.counts(rle);
    let k = 0;
    for (let i = 0; i < counts.length; i++) {
      const n = counts[i];
      if (i % 2 === 1) {
        for (let j = k; j < k + n; j++) {
          const x = (j / h) | 0;
          bits[(j - x * h) * w + x] = 1;
        }
      }
      k += n;
    }
    return bits;
  },

  // An offscreen canvas (w x h) with the mask painted in `rgba` ([r, g, b, a], 0..255), transparent elsewhere.
  toCanvas(bits, h, w, rgba) {
    const canvas = document.createElement("canvas");
    canvas.width = w;
    canvas.height = h;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(w, h);
    const px = new Uint32Array(img.data.buffer);
    // ImageData is RGBA in memory; on little-endian machines a Uint32 reads it as ABGR.
    const color = ((rgba[3] << 24) | (rgba[2] << 16) | (rgba[1] << 8) | rgba[0]) >>> 0;
    for (let i = 0; i < bits.length; i++) if (bits[i]) px[i] = color;
    ctx.putImageData(img, 0, 0);
    return canvas;
  },
};
