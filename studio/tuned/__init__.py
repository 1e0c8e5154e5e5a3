"""What you do with a tuned model: chat with it, score it, compare it blind, export it."""
