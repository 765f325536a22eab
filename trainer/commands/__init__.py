"""The `openrft` commands that train and serve: each module is one command with its own `main`
(train.py: the GRPO loop itself; evaluate.py, serve.py, demo.py, report.py, model.py), dispatched
by trainer/cli.py. runtime.py and allocator.py set up a heavy command's process."""
