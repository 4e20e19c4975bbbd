"""gemma_app: a Gradio chat app on our own JAX/Flax Gemma engine."""
