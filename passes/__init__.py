"""actc graph passes: candidate finding, bit allocation and graph rewriting."""
