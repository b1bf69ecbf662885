"""Side-by-side timing of gradnoise's kernels against the operations they
replace, shared by `python -m gradnoise bench` and benchmarks/."""
