"""What the report's section renderers may quote: :class:`ReportInputs`."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ReportInputs:
    """Everything a section renderer may quote: the measured values and the names of the written files."""

    meta: dict
    oracle: dict
    studies: dict
    summaries: list
    figures: dict               # figure key -> PNG file name
    data_files: list            # raw JSON files, relative to the report directory
    seeds: dict | None = None   # verification.report.seed_evidence.seeds_phase's output (None: not run)
    first_order: dict | None = None  # {"where", "result"} of verification.studies.first_order.real_first_order
    kl_bounds: list = field(default_factory=list)  # seed_evidence.kl_bounds of the single-seed grid's runs

    @property
    def n_eval(self) -> int:
        return int(self.meta["harness_config"].get("eval_size", 0) or 0)
