"""The paper's contribution on top of the re-implemented LDM (Vilouras et al., MIDL 2026): anatomy vocabulary
and LUT, report-based weak supervision, dataset readers, the phantom world, learnable prompts, attention
store, losses, heatmap extraction and metrics. See ARCHITECTURE.md for the file-by-file layout."""
