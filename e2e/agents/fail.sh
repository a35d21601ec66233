#!/bin/sh
# Stand-in agent that fails: a line on stdout, a line on stderr, exit status 1.
echo "fail agent: starting"
echo "fail agent: simulated crash" >&2
exit 1
