"""Communication accounting: the bytes a compiled step moves, per mesh level.

    from jdmt.comm import comm_report
    report = comm_report(jitted_step, *args, mesh=mesh)
    report.cross_host_bytes, report.intra_host_bytes, report.summary()

Files:

- `report.py`: the entry points (`comm_report`, `comm_report_compiled`,
  `comm_report_from_text`), the result types (`CommReport`, `Collective`)
  and the byte model: which bytes each kind of collective moves, and whether
  a peer is on the same host or another one. Its docstring is the reference
  for what is counted.
- `hlo.py`: reading HLO text: computations, instructions, the collectives
  reachable from ENTRY (with while/conditional/async context), operand
  shapes and bytes, and `parse_replica_groups`.
"""

from jdmt.comm.hlo import parse_replica_groups
from jdmt.comm.report import (
    Collective,
    CommReport,
    comm_report,
    comm_report_compiled,
    comm_report_from_text,
)

__all__ = [
    "Collective",
    "CommReport",
    "comm_report",
    "comm_report_compiled",
    "comm_report_from_text",
    "parse_replica_groups",
]
