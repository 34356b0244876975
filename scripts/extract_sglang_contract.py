"""Extracts the parts of SGLang's wheel the tests check our wire formats against.

    python scripts/extract_sglang_contract.py <sglang-0.5.23 wheel> <out dir>

Writes, into <out dir>:
* `api_types.py` — the `/generate` JSON contract (`sglang/api/v1/api_types.py`, as is).
* `sglang_serializer.py` — `MultiprocessingSerializer`, `SafeUnpickler` and
  `_safe_load_torch_storage`, the code SGLang decodes `/update_weights_from_tensor` payloads
  with, cut out of `sglang/srt/utils/common.py` unchanged (that module itself imports triton
  and much more, so it cannot be imported here).
Both files are Apache-2.0 code of the SGLang project.
"""

from __future__ import annotations

import ast
import sys
import zipfile
from pathlib import Path

SERIALIZER_NAMES = ("_safe_load_torch_storage", "SafeUnpickler", "MultiprocessingSerializer")
SERIALIZER_HEADER = '''"""SGLang 0.5.23's tensor-payload (de)serializer, extracted unchanged from the wheel's
sglang/srt/utils/common.py by scripts/extract_sglang_contract.py (Apache-2.0, the SGLang project).
"""
import io
import pickle
from multiprocessing.reduction import ForkingPickler

import torch

try:
    import pybase64
except ImportError:  # same b64encode / b64decode(validate=) signatures
    import base64 as pybase64

'''


def extract(wheel: str, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        api_types = zf.read("sglang/api/v1/api_types.py")
        common = zf.read("sglang/srt/utils/common.py").decode()
    tree = ast.parse(common)
    found = {node.name: ast.get_source_segment(common, node) for node in tree.body
             if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in SERIALIZER_NAMES}
    missing = [n for n in SERIALIZER_NAMES if n not in found]
    if missing:
        raise SystemExit(f"{wheel}: sglang/srt/utils/common.py has no {missing}")
    (out / "api_types.py").write_bytes(api_types)
    body = "\n\n\n".join(found[n] for n in SERIALIZER_NAMES)
    (out / "sglang_serializer.py").write_text(SERIALIZER_HEADER + "\n" + body + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    extract(sys.argv[1], sys.argv[2])
