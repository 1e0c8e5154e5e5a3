"""The Gradio front end: one module a tab, plus the app builder. Everything here is thin: it calls the core."""
