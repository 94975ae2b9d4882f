"""The lab's instruments: benchmark grids and their plots (issue 17)."""
