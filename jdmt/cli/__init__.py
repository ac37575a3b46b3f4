"""Command lines: `jdmt-train` (`train`) and `jdmt-partition` (`partition`)."""
