"""The PyTorch backend (``backend="torch"``): token-chunked, exact, for CPUs and any device.

It mirrors `fusedkd.kernels`: one file per loss, each with its backend entry point and its chunk
loop, over shared tile arithmetic and one autograd Function.

- `streamed`: the one autograd Function of every loss here (`StreamedFunction`: reduction, gradients
  formed in the forward or recomputed in the backward, one no-gradient path); a loss plugs in its
  chunk loop (`Streamed`).
- `tiles`: chunk sizes, the per-row divergence, cross-entropy and gradient of a tile
  (`kd_tile_terms`), the tokens that count (`Tokens`).
- `gemm`: a chunk's logit tile on the GEMM (`project`) and its gradient products
  (`gradient_products`), 16-bit GEMMs with float32 results where the tiles backend runs them.
- `fused_linear_kd`: `fused_linear_kd_loss` (hidden states and lm_head weights of both models).
- `kd_logits`: `kd_loss` (logits the caller holds).
- `topk_kd`: `fused_linear_topk_kd_loss` (a sparse top-k teacher).
- `teacher_topk`: `teacher_topk` (the teacher's top-k log-probabilities, block by block).

Every entry point takes the inputs as `fusedkd._inputs` prepares them (checked, flattened, contiguous
int64 labels and contiguous biases) and the validated `fusedkd._options.KDOptions`, and runs with
autocast off (the public losses).
"""
