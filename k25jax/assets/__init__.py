"""Package data: the embedded tiny tokenizer's ranks (``tiny_tiktoken.model``) and the script that makes them."""
