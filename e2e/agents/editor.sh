#!/bin/sh
# Stand-in coding agent: reads the prompt on stdin, changes files in its working directory (the
# job's workspace) and, from its third iteration on, prints the completion promise.
prompt=$(cat)
n=${ITERATION:-1}
mkdir -p kiln-agent
echo "iteration $n" >>kiln-agent/progress.txt
printf 'job %s, iteration %s\nprompt: %s\n' "${JOB_ID:-unknown}" "$n" "$prompt" >"kiln-agent/iteration-$n.txt"
echo "editor agent: iteration $n wrote kiln-agent/iteration-$n.txt"
if [ "$n" -ge 3 ]; then
  echo "editor agent: done. ${COMPLETION_PROMISE:-RALPH_COMPLETE}"
fi
