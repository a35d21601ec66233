#!/bin/sh
# Stand-in agent that never finishes: for cancel, stop and lost-runner tests.
echo "hang agent: working"
while :; do
  sleep 1
done
