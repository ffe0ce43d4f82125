"""The Batch API's folder: files and batches as small JSON records beside their contents, each
record written whole (a temporary file, fsync, rename), and the leases that keep two servers off
one batch.

Layout under BATCH_DIR::

    files/<file_id>.json        the File object, written after its content
    files/<file_id>.jsonl       the content
    batches/<batch_id>.json     the Batch object and its runner's state
    batches/<batch_id>.lease    which server runs the batch, and until when
    batches/<batch_id>.cancel   a cancellation asked for (by any server)
    batches/<batch_id>.output   answered lines so far, and .errors: lines answered with errors
    tmp/                        files being written

Every path is built from an id that matched its pattern (`FILE_ID`, `BATCH_ID`) first, so no id a
client sends can name a path outside the folder. Ids are 128 random bits: unguessable. Every call
here is blocking file work, made off the event loop (`asyncio.to_thread`) by its callers.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from ... import errors

FILE_ID = re.compile(r"file-[0-9a-f]{32}")
BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")
FINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# A temporary file older than this was left by a process that died while writing it.
STALE_TMP_S = 3600.0


def new_file_id() -> str:
    return f"file-{secrets.token_hex(16)}"


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(16)}"


def checked(pattern: re.Pattern[str], value: Any, noun: str) -> str:
    """`value` if it is a well-formed id of `noun`; otherwise 404, as for an id that is unknown."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise errors.not_found(f"no such {noun}")
    return value


def fsync_dir(path: Path) -> None:
    """Make a rename or a new name in `path` durable (a no-op where directories cannot be
    opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = root / "files"
        self.batches = root / "batches"
        self.tmp = root / "tmp"

    def ensure(self) -> None:
        for folder in (self.files, self.batches, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)

    # --- whole-file writes ----------------------------------------------------------------------

    def temp_path(self) -> Path:
        self.ensure()
        return self.tmp / f"{secrets.token_hex(16)}.tmp"

    def write_json(self, path: Path, value: Any) -> None:
        """Replace `path` with `value` as JSON: readers see the old record or the new, whole."""
        temp = self.temp_path()
        with open(temp, "wb") as out:
            out.write(orjson.dumps(value))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
        fsync_dir(path.parent)

    @staticmethod
    def read_json(path: Path) -> dict[str, Any] | None:
        try:
            value = orjson.loads(path.read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return None
        return value if isinstance(value, dict) else None

    def place(self, temp: Path, path: Path) -> None:
        """Move a written temporary file to its name, durably."""
        with open(temp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temp, path)
        fsync_dir(path.parent)

    def clean_tmp(self) -> None:
        """Remove what dead writers left in tmp/ (old enough that no live writer holds it)."""
        now = time.time()
        with contextlib.suppress(FileNotFoundError):
            for entry in self.tmp.iterdir():
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > STALE_TMP_S:
                        entry.unlink()

    # --- files ----------------------------------------------------------------------------------

    def file_record(self, file_id: str) -> Path:
        return self.files / f"{checked(FILE_ID, file_id, 'file')}.json"

    def file_content(self, file_id: str) -> Path:
        return self.files / f"{checked(FILE_ID, file_id, 'file')}.jsonl"

    def add_file(self, file_id: str, temp: Path | None, record: dict[str, Any]) -> None:
        """Store a file: its content first (moved from `temp`; None: already in place), then its
        record, so that a listed file always has its content."""
        self.ensure()
        if temp is not None:
            self.place(temp, self.file_content(file_id))
        self.write_json(self.file_record(file_id), record)

    def get_file(self, file_id: str) -> dict[str, Any] | None:
        return self.read_json(self.file_record(file_id))

    def remove_file(self, file_id: str) -> bool:
        """Remove a file's record, then its content; whether it was there."""
        try:
            self.file_record(file_id).unlink()
        except FileNotFoundError:
            return False
        with contextlib.suppress(FileNotFoundError):
            self.file_content(file_id).unlink()
        return True

    def all_files(self) -> list[dict[str, Any]]:
        """Every file's record, oldest first."""
        return sorted(self._records(self.files, FILE_ID), key=_order)

    # --- batches --------------------------------------------------------------------------------

    def batch_path(self, batch_id: str, suffix: str) -> Path:
        return self.batches / f"{checked(BATCH_ID, batch_id, 'batch')}{suffix}"

    def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        return self.read_json(self.batch_path(batch_id, ".json"))

    def put_batch(self, record: dict[str, Any]) -> None:
        self.ensure()
        self.write_json(self.batch_path(record["batch"]["id"], ".json"), record)

    def all_batches(self) -> list[dict[str, Any]]:
        """Every batch's record, oldest first."""
        return sorted(self._records(self.batches, BATCH_ID), key=_order)

    def cancel_requested(self, batch_id: str) -> float | None:
        """When a cancellation was asked for, or None."""
        try:
            return self.batch_path(batch_id, ".cancel").stat().st_mtime
        except FileNotFoundError:
            return None

    def request_cancel(self, batch_id: str) -> None:
        self.batch_path(batch_id, ".cancel").touch(exist_ok=True)

    def remove_batch(self, record: dict[str, Any]) -> None:
        """A finished batch, its output and error files, and what its run left."""
        batch = record["batch"]
        for file_id in (batch.get("output_file_id"), batch.get("error_file_id")):
            if file_id:
                self.remove_file(file_id)
        for suffix in (".json", ".cancel", ".lease", ".output", ".errors"):
            with contextlib.suppress(FileNotFoundError):
                self.batch_path(batch["id"], suffix).unlink()

    def _records(self, folder: Path, pattern: re.Pattern[str]) -> Iterator[dict[str, Any]]:
        try:
            entries = list(folder.iterdir())
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.suffix == ".json" and pattern.fullmatch(entry.stem):
                record = self.read_json(entry)
                if record is not None:
                    yield record

    # --- bounds ---------------------------------------------------------------------------------

    def prune_batches(self, retention: int) -> bool:
        """Keep at most `retention` - 1 batches, so that one more fits: the oldest finished go.
        False when all that are kept are unfinished (a new batch has to wait)."""
        records = self.all_batches()
        excess = len(records) - retention + 1
        for record in records:
            if excess <= 0:
                break
            if record["batch"]["status"] in FINAL:
                self.remove_batch(record)
                excess -= 1
        return excess <= 0

    def prune_files(self, max_files: int) -> bool:
        """Keep at most `max_files` - 1 uploads, so that one more fits: the oldest that no
        unfinished batch reads go. False when every one kept is such a batch's input."""
        uploads = [r for r in self.all_files() if r["file"]["purpose"] == "batch"]
        excess = len(uploads) - max_files + 1
        if excess <= 0:
            return True
        in_use = self.inputs_in_use()
        for record in uploads:
            if excess <= 0:
                break
            if record["file"]["id"] not in in_use:
                self.remove_file(record["file"]["id"])
                excess -= 1
        return excess <= 0

    def inputs_in_use(self) -> set[str]:
        """The input files of unfinished batches."""
        return {
            r["batch"]["input_file_id"]
            for r in self.all_batches()
            if r["batch"]["status"] not in FINAL
        }


def _order(record: dict[str, Any]) -> int:
    return int(record.get("order", 0))


# --------------------------------------------------------------------------------------------- #
# Leases


class Lease:
    """A claim on a batch by one server (`owner`), in a file that says until when it holds.

    The holder renews it well before it ends and stops writing the batch's files once it is no
    longer sure it holds it (`valid`: by its own clock, a quarter of the term before the end it
    wrote). Another server takes a lease over only after that end, by its clock: so two servers
    whose clocks differ by less than a quarter of the term never write one batch at once. A lease
    is created with O_EXCL and taken over by renaming the ended file away first: of two servers
    that both find it ended, one rename succeeds.
    """

    def __init__(self, path: Path, owner: str, term_s: float) -> None:
        self.path = path
        self.owner = owner
        self.term_s = term_s
        self._renewed = -float("inf")  # time.monotonic() of the last write that held

    @property
    def valid(self) -> bool:
        return time.monotonic() < self._renewed + self.term_s * 0.75

    def _content(self) -> bytes:
        return orjson.dumps({"owner": self.owner, "until": time.time() + self.term_s})

    @staticmethod
    def ended(content: dict[str, Any] | None, within_s: float = 0.0) -> bool:
        """Whether a lease file's content is past its end, or less than `within_s` before it (or
        unreadable: a torn write)."""
        until = content.get("until") if content else None
        return not isinstance(until, int | float) or until < time.time() + within_s

    def acquire(self) -> bool:
        started = time.monotonic()
        try:
            self._create()
        except FileExistsError:
            if not self.ended(Store.read_json(self.path)):
                return False
            stale = self.path.with_name(f"{self.path.name}.{secrets.token_hex(8)}")
            try:
                os.rename(self.path, stale)
            except FileNotFoundError:
                return False  # another server took it over first
            if not self.ended(Store.read_json(stale)):  # renewed meanwhile: put it back
                with contextlib.suppress(OSError):
                    os.link(stale, self.path)
                stale.unlink(missing_ok=True)
                return False
            stale.unlink(missing_ok=True)
            try:
                self._create()
            except FileExistsError:
                return False
        self._renewed = started
        return True

    def _create(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, self._content())
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.path.parent)

    def renew(self) -> bool:
        """Extend the lease; False once it is no longer sure to be ours.

        Reading the file and replacing it are two steps: a renewal that stalls between them (a
        slow fsync on a busy disk) may reach the file after the end it read, when another server
        may have taken the lease over and written its own file. So the new file is put in place
        only before that end, less the clock skew a takeover allows for, and the renewal counts
        only if it was in place by then.
        """
        started = time.monotonic()
        current = Store.read_json(self.path)
        if not self.valid or current is None or current.get("owner") != self.owner:
            return self._lost()
        temp = self.path.with_name(f"{self.path.name}.{secrets.token_hex(8)}.tmp")
        try:
            with open(temp, "wb") as out:
                out.write(self._content())
                out.flush()
                os.fsync(out.fileno())
            if self._ending(current):  # too late to be sure no takeover came first
                return self._lost()
            os.replace(temp, self.path)
        finally:
            temp.unlink(missing_ok=True)
        if self._ending(current):
            return self._lost()
        self._renewed = started
        return True

    def _lost(self) -> bool:
        self._renewed = -float("inf")
        return False

    def release(self) -> None:
        """Give the lease back: remove its file while it is ours and its end is ahead (no
        takeover comes before the end); after that it is left to end on its own, as the file may
        already be a new holder's."""
        current = Store.read_json(self.path)
        if current is not None and current.get("owner") == self.owner and not self._ending(current):
            self.path.unlink(missing_ok=True)
        self._lost()

    def _ending(self, content: dict[str, Any]) -> bool:
        """Whether a lease file's end is near enough that another server, its clock up to a
        quarter of the term ahead, may take it over."""
        return self.ended(content, within_s=self.term_s / 4)
