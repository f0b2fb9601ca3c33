"""The report (``proma-verify report``): REPORT.md, its figures and JSON, built from the studies' measurements.

- :mod:`.generate` the phases and ``generate_report``/``rerender_report``; :mod:`.inputs` what sections may quote;
- :mod:`.render` the section order and its own sections; :mod:`.projection_text` (sections 1-2),
  :mod:`.grid_text` (sections 3, 4, 8), :mod:`.seed_text` (verdicts, seed tables, secondary analyses) and
  :mod:`.study2_section` (the second study) the others; :mod:`.markdown` number and table formatting;
- :mod:`.seed_evidence` the report's seed study per mode and the first-order check; :mod:`.plots` the figures.
"""
