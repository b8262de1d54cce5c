"""The measuring tools over the runtime: llama-bench's throughput method (bench) and
llama-perplexity's method (perplexity). They sit above the runtime and read it; nothing below
imports them."""
