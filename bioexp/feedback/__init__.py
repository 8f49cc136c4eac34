"""Feedback-alignment family: autograd Functions whose backward pass uses a feedback matrix."""
