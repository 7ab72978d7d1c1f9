"""Machine admission: a machine trains a plan's runs only after it reproduces the plan's canary bit for bit.

The canary is a short fixed run of the plan's config (``canary:`` in the plan) with a committed reference run
file. On a machine not yet admitted, the harness trains the canary, compares every recorded number but the
timings and the provenance with the reference, and refuses to train when one differs. The admission is kept in
the runs root (``admission.json``) and copied into every run file, so the report pairs runs only among machines
that computed the same numbers at one revision of the training path.

- ``machine_id(runs_root)``: the host name, ``/etc/machine-id`` and a random token kept in the runs root, hashed:
  two machines of one kind (same CPU model, same software) still get different ids.
- ``training_path_revision()``: a hash of the files under ``dynsila/`` (what a run's numbers depend on), not the
  commit: a change elsewhere in the repository keeps the revision.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import secrets
import socket
from pathlib import Path
from typing import Any

from benchmarks.sila_experiment.families import PROVENANCE, TIMINGS, numbers
from benchmarks.toolkit import REPO_ROOT
from dynsila.runs.checkpoint import atomic_write_text

ADMISSION = "admission.json"  # in the runs root: this machine's admission at one training-path revision
TOKEN = "machine.token"  # in the runs root: a random id drawn once, so cloned machines differ


def training_path_revision(root: Path = REPO_ROOT) -> str:
    """sha256 (first 16 hex digits) over the path and bytes of every Python file under ``dynsila/``."""
    digest = hashlib.sha256()
    for path in sorted((root / "dynsila").rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def machine_id(runs_root: Path) -> str:
    runs_root.mkdir(parents=True, exist_ok=True)
    token_file = runs_root / TOKEN
    if not token_file.exists():
        atomic_write_text(token_file, secrets.token_hex(16))
    system_id = Path("/etc/machine-id")
    parts = [socket.gethostname(), system_id.read_text().strip() if system_id.exists() else "", token_file.read_text()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def canary_differences(record: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """The top-level keys whose numbers differ between a canary run and its reference (timings and provenance
    left out); empty when the machine reproduced the reference bit for bit."""
    mine, theirs = numbers(record, TIMINGS + PROVENANCE), numbers(reference, TIMINGS + PROVENANCE)
    return sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))


def current_admission(runs_root: Path, revision: str) -> dict[str, Any] | None:
    """This machine's stored admission at ``revision``, or None (never admitted here, or at another revision)."""
    path = runs_root / ADMISSION
    if not path.exists():
        return None
    stored = json.loads(path.read_text())
    same = stored.get("machine") == machine_id(runs_root) and stored.get("training_path") == revision
    return stored if same else None


def admit(runs_root: Path, record: dict[str, Any], reference: dict[str, Any], reference_path: str) -> dict[str, Any]:
    """Compare a canary run with its reference and store the outcome in the runs root; returns the admission."""
    differences = canary_differences(record, reference)
    admission = {
        "machine": machine_id(runs_root),
        "training_path": training_path_revision(),
        "canary": "differs" if differences else "equal",
        "differences": differences,
        "reference": reference_path,
        "date": datetime.date.today().isoformat(),
    }
    atomic_write_text(runs_root / ADMISSION, json.dumps(admission, indent=1))
    return admission
