#!/usr/bin/env python3
"""Generates keyauthority_client/_gen/ from ../../proto (or $KEY_AUTHORITY_PROTO_DIR).

pip install -r requirements.txt
python generate.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from keyauthority_client._codegen import generate, proto_dir  # noqa: E402

if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else proto_dir()
    print(f"generated {generate(source)} from {source}")
