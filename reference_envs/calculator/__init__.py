"""calculator: multi-step arithmetic with calculator tools (add, subtract, multiply, submit_answer).
Numbers are big enough that a small model cannot do them in its head: a successful episode makes at
least two arithmetic tool calls, then submits."""
