"""The measuring tools over the runtime: llama-bench's throughput method (bench) and
llama-perplexity's method (perplexity); and llama-quantize's Q4_K_M / Q5_K_M mixes (requant).
They sit above the runtime and read it; nothing below imports them."""
