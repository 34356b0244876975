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
import time

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
        if pos + _HEADER + length > len(data):
            return  # a record still being written
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
    """{"run_id", "project", "name", "group", "tags", "history": [row dicts], "finished"} of one
    file; finished: its exit record is there."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict = {"history": [], "finished": False}
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
        elif kind == "exit":
            out["finished"] = True
    return out


def offline_runs(run_dir: str, *, timeout_s: float = 60.0) -> list[dict]:
    """Every offline run of `run_dir/wandb/`, oldest first ("dir": its folder name there).

    wandb-core writes the file in the background and finishes shortly after `run.finish()`
    returns, so this waits (up to timeout_s) until every run's exit record is there.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        files = sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb")))
        runs = [dict(read_offline_run(f), dir=os.path.basename(os.path.dirname(f))) for f in files]
        if all(r["finished"] for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.1)
