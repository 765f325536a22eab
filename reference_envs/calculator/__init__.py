"""calculator: two-step arithmetic with calculator tools (`add`, `multiply`). Numbers are big enough
that a small model cannot do them in its head: a successful episode makes two tool calls, then
answers in text."""
