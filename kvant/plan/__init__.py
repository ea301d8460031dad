"""`kvant plan`: predicted peak memory per artifact type and context length, and what fits.

peak = weights + KV cache + backend overhead, where
- weights come from the real bits per weight of each type on this architecture's tensors
  (which tensors a format leaves in 16/32 bits matters: embeddings are 0.5 GB at 11.4B);
- KV cache = 2 x layers x kv_heads x head_dim x bytes x context;
- overhead = base + logits x context per runtime stack (transformers alone, with
  bitsandbytes, with GPTQModel; llama.cpp; ORT GenAI), the base fitted to `kvant bench`
  measurements (results.json) when given, else the defaults below, measured by the bench on
  this project's 2-core CPU machine.

The package, one module per part: sizes (parsing '8GiB'), kinds (each artifact kind's bits
per weight per tensor group), kv (every runtime's KV cache precisions), peaks (the memory
model and the plan table), fit (overheads fitted to bench results), steps (the release's
own steps, for the rehearsal).
"""
