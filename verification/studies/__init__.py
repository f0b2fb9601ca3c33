"""The studies: the runs that measure PROMA on GSM8K and the statistics that judge them (may import the oracle, never
the report).

- :mod:`.seeds` the resumable multi-seed study (``python -m verification.studies.seeds``), :mod:`.tables` the
  per-run numbers and intervals of its result files, :mod:`.plan` what is left of a study and its cost;
- :mod:`.study2` the second pre-registered study (``python -m verification.studies.study2``);
- :mod:`.preregistered`, :mod:`.preregistered2` the pre-registered families and verdicts, :mod:`.secondary` the
  analyses that decide nothing, :mod:`.claims` the regime conditions, :mod:`.stats` the intervals;
- :mod:`.grid` the single-seed grid of runs, :mod:`.equal_gain` its KL at equal reward gain;
- :mod:`.projection_error` the projection error on real microbatches, :mod:`.first_order` the first-order check,
  :mod:`.realcase` the real GSM8K microbatch and the oracle cases taken from it.
"""
