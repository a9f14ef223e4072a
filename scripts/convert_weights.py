#!/usr/bin/env python3
"""Convert model weights between PyTorch and jgpt, both ways, bit for bit.

    python scripts/convert_weights.py to-jgpt  IN.pt  OUT.npz   # torch state dict / record checkpoint -> jgpt
    python scripts/convert_weights.py to-torch IN.npz OUT.pt    # jgpt checkpoint -> torch state dict

`--help` (on the command or on either direction) lists the options. The work is done by
jgpt.checkpoint.main, also installed as the `jgpt-convert` command. Needs torch:
pip install 'jgpt[torch]'.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a fresh clone, uninstalled

from jgpt.checkpoint import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
