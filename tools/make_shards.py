#!/usr/bin/env python
"""Write WebDataset shards from a folder of images with .txt transcriptions, or the synthetic demo set.

    python tools/make_shards.py SRC_DIR OUT_DIR [--captions C.json] [--safeboxes S.json] [--px-scales P.json]
        [--transcriptions T.json]   # transcriptions from one file (tools/annotate.py's) instead of .txt files
        [--unreadable U.json]   # boxes of text OCR could not read, for training with data.mask_unreadable
        [--seed S]   # the random sample order (default 0; --order sorted keeps path order)
    python tools/make_shards.py --synthetic 1000 OUT_DIR --seed 0

All options: --help; formats and key syntax: docs/data.md. Installed as ``textdiff-make-shards`` too.
"""

import sys

from textdiff.data.shards import main

if __name__ == "__main__":
    sys.exit(main())
