"""The benchmarks' official scoring rules (spec llava15_slime_llavar.md §B, uhd.md §8), one module per rule."""
