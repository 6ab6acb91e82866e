"""The durable, append-only event log under the server's --state-dir (read by training too).

One record per acknowledged write request (a Feedback batch, an UpsertItems batch, a DeleteItems
batch), so a request is applied all-or-nothing on replay. Record layout:

    magic b"SRL1" | payload length (uint32 LE) | crc32 of payload (uint32 LE) | payload (UTF-8 JSON)

`append` writes the whole record and fsyncs before it returns; the caller acknowledges only after.
`read_log` verifies every record; a torn or corrupt tail (a crash mid-write) is reported and, when
asked, truncated away so appends continue after the last good record.
"""
from __future__ import annotations

import json
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"SRL1"
HEADER = struct.Struct("<4sII")
LOG_NAME = "events.log"
MAX_RECORD_BYTES = 64 << 20


@dataclass
class LogScan:
    records: list[dict[str, Any]]
    good_bytes: int  # offset just past the last good record
    torn_bytes: int  # bytes after it that were dropped (0 = clean log)
    problem: str  # why the tail was dropped ("" = clean)


def encode_record(payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return HEADER.pack(MAGIC, len(body), zlib.crc32(body)) + body


def read_log(path: Path, truncate: bool = False) -> LogScan:
    """All good records of the log at path (missing file = empty). Stops at the first bad record."""
    path = Path(path)
    if not path.exists():
        return LogScan([], 0, 0, "")
    data = path.read_bytes()
    records, pos, problem = [], 0, ""
    while pos < len(data):
        if len(data) - pos < HEADER.size:
            problem = f"torn header at byte {pos}"
            break
        magic, length, crc = HEADER.unpack_from(data, pos)
        body = data[pos + HEADER.size: pos + HEADER.size + length]
        if magic != MAGIC or length > MAX_RECORD_BYTES:
            problem = f"bad record header at byte {pos}"
            break
        if len(body) < length:
            problem = f"torn record at byte {pos} ({len(body)} of {length} bytes)"
            break
        if zlib.crc32(body) != crc:
            problem = f"checksum mismatch at byte {pos}"
            break
        try:
            records.append(json.loads(body.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            problem = f"undecodable record at byte {pos}"
            break
        pos += HEADER.size + length
    torn = len(data) - pos
    if torn and truncate:
        with open(path, "r+b") as fh:
            fh.truncate(pos)
            fh.flush()
            os.fsync(fh.fileno())
    return LogScan(records, pos, torn, problem)


class EventLog:
    """Appender for one log file; thread-safe; each append is durable when it returns."""

    def __init__(self, state_dir: Path, fsync: bool = True) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / LOG_NAME
        self.fsync = fsync
        self.scan = read_log(self.path, truncate=True)  # drop a torn tail before appending after it
        self._lock = threading.Lock()
        self._fh = open(self.path, "ab")
        if fsync:
            _fsync_dir(self.dir)

    def append(self, payload: dict[str, Any]) -> None:
        record = encode_record(payload)
        with self._lock:
            self._fh.write(record)
            self._fh.flush()
            if self.fsync:
                os.fsync(self._fh.fileno())

    @property
    def size(self) -> int:
        return self._fh.tell()

    def close(self) -> None:
        with self._lock:
            self._fh.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def feedback_events(path: Path) -> list[dict[str, Any]]:
    """Every event of every feedback record in a state dir's log (for training on served feedback)."""
    log_path = Path(path)
    if log_path.is_dir():
        log_path = log_path / LOG_NAME
    return [e for r in read_log(log_path).records if r.get("kind") == "feedback" for e in r.get("events", [])]
