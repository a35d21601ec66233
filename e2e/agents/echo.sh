#!/bin/sh
# Stand-in interactive agent for task jobs: answers every line it reads on stdin (the prompt, then
# each delivered message) with "echo: <line>", until its input is closed.
echo "echo agent: ready"
while IFS= read -r line; do
  echo "echo: $line"
done
echo "echo agent: input closed, bye"
