"""The workflowd process: settings, CLI, worker loop, HTTP surface."""
