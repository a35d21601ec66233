#!/bin/sh
# Stand-in agent that does nothing: one line of output, exit 0, its input left unread.
echo "noop agent: nothing to do"
