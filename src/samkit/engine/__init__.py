"""Running samkit over many images: input listing, resumable local runs, and Ray."""
