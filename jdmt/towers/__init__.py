"""Disaggregated Multi-Tower: SPTT, Tower Modules and the Tower Partitioner."""
