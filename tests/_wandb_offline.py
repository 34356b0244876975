"""Reads W&B offline run files (`run-<id>.wandb`) back, for tests.

The file is a LevelDB-style log (wandb's `datastore` format): a 7-byte header (`:W&B`, magic
0xBEE1, version), then 32 KiB blocks of records, each with a 7-byte header (crc32 4, length 2
little-endian, type 1: full/first/middle/last); a payload is one serialized `Record` protobuf.
"""

from __future__ import annotations

import glob
import json
import os
import struct

_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(path: str):
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, parts = _HEADER, []
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        chunk = data[pos + _HEADER: pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            parts = [chunk]
        elif kind == _MIDDLE:
            parts.append(chunk)
        elif kind == _LAST:
            yield b"".join(parts + [chunk])
        elif kind == 0 and length == 0:  # zero padding at the end of a block
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0


def read_offline_run(run_file: str) -> dict:
    """{"run_id", "project", "name", "group", "tags", "history": [row dicts]} of one file."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict = {"history": []}
    for payload in _payloads(run_file):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(run_id=run.run_id, project=run.project, name=run.display_name,
                       group=run.run_group, tags=list(run.tags))
        elif kind == "history":
            out["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in record.history.item})
    return out


def offline_runs(run_dir: str) -> list[dict]:
    """Every offline run of `run_dir/wandb/`, oldest first."""
    files = sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb")))
    return [read_offline_run(f) for f in files]
