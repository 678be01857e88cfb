"""The finished runs of a comparison, kept in its output folder so that an interrupted or
extended comparison resumes instead of starting over: one record (JSON) and its held-out tensors
(rows.pt's entry) per run under records/, keyed by

    key = sha256(JSON of {run: the run (arm, architecture, sae and runner overrides, seed, lr, k,
                 length), base, eval, source, data: the study's data hashes before any run,
                 versions: sae_lens and torch})

A stored run whose key differs (another config, other data, other versions) is trained again."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from sae_lens_allocation.analysis.compare.config import Run, slug

Record = dict[str, Any]


@dataclasses.dataclass
class RunTensors:
    """The held-out tensors of one run: per protocol the per-row sums, and the per-latent
    steering values (None where the source has none)."""

    rows: dict[str, dict[str, torch.Tensor]]
    steering: torch.Tensor | None


class RunStore:
    """records/<run folder>.json and .pt in a comparison's output folder (module docstring)."""

    def __init__(self, out: Path, cfg: dict[str, Any], data: dict[str, Any]) -> None:
        import sae_lens

        self.folder = out / "records"
        self.context = json.dumps({"base": cfg["base"], "eval": cfg["eval"], "source": cfg["source"], "data": data,
                                   "versions": {"sae_lens": sae_lens.__version__, "torch": torch.__version__}},
                                  sort_keys=True, default=str)

    def key(self, run: Run) -> str:
        text = json.dumps({"run": dataclasses.asdict(run), "context": self.context}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def load(self, run: Run) -> tuple[Record, RunTensors] | None:
        """The stored record and tensors of `run`, or None where none is stored under its key."""
        path = self.folder / f"{slug(run)}.json"
        if not path.exists() or not (self.folder / f"{slug(run)}.pt").exists():
            return None
        stored = json.loads(path.read_text())
        if stored.get("key") != self.key(run):
            return None
        tensors = torch.load(self.folder / f"{slug(run)}.pt")
        return stored["record"], RunTensors(tensors["rows"], tensors["steering"])

    def save(self, run: Run, record: Record, tensors: RunTensors) -> Record:
        """Store a finished run (tensors first: a record on disk means the run is complete) and
        return the record as a reload gives it (JSON keys are strings), so a fresh and a resumed
        comparison hold the same records."""
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save({"rows": tensors.rows, "steering": tensors.steering}, self.folder / f"{slug(run)}.pt")
        text = json.dumps({"key": self.key(run), "record": record}, indent=1, default=str)
        tmp = self.folder / f"{slug(run)}.json.tmp"
        tmp.write_text(text)
        tmp.replace(self.folder / f"{slug(run)}.json")
        return json.loads(text)["record"]
