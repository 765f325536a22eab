"""calculator: products of three two-digit numbers with a `multiply` tool. Too big for a small model
to do in its head: a successful episode makes two tool calls, then answers in text."""
