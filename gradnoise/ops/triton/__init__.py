"""Triton kernels of gradnoise, registered as the ``torch.ops.gradnoise_triton`` ops.

They run on GPUs, and on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``, set before this package is imported), which is how
they are tested on machines without a GPU. Import the submodules explicitly
(``from gradnoise.ops.triton import linear``); importing this package alone
does not import triton.
"""
