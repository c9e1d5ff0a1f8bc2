"""Integrations with other libraries: `qwenfast.integrations.diffusers.accelerate(pipe)`."""
