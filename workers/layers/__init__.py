"""Model-agnostic building blocks: linears, embeddings, norms, rotary, activation, attention."""
