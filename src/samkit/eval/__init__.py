"""The Segment Anything paper's zero-shot protocols and the data set readers they run on.

`run_eval(protocol, data, model, limit, out)` is the entry point; `samkit eval` on the command line.
"""

from samkit.eval.datasets import DatasetError, open_dataset
from samkit.eval.grabcut import GrabCutPredictor
from samkit.eval.protocols import PromptModel
from samkit.eval.run import PROTOCOLS, ProtocolError, format_table, run_eval

__all__ = [
    "PROTOCOLS",
    "DatasetError",
    "GrabCutPredictor",
    "PromptModel",
    "ProtocolError",
    "format_table",
    "open_dataset",
    "run_eval",
]
