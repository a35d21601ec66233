#!/bin/sh
# Stand-in agent for the runner's tests. The first line of stdin is the prompt; words in it pick
# the behaviour (several may be combined):
#   write      write kiln/iteration-$ITERATION.txt holding the whole prompt (the rest of stdin too)
#   promise@N  print the completion promise ($COMPLETION_PROMISE) from iteration N on
#   fail       exit 1 after printing to stdout and stderr
#   flaky      exit 1 the first time each iteration runs (a marker in /tmp remembers)
#   hang       write its pid to /tmp/kiln-hang-$JOB_ID.pid (its child's to .child) and run
#              forever, printing a line every second
#   slow       sleep 1 second before finishing
#   big        write 3 MiB to kiln/big.bin
#   flood      print 60 MiB: one line of 30 MiB, then 30 MiB of 100-byte lines
#   json       print claude-stream-json lines
#   echo       interactive: answer each further line with "echo: <line>" until stdin closes
#   env        print its environment, one "env: NAME=value" line per variable
#   turns      like Claude Code: announce session sess-$JOB_ID in stream-json and report usage;
#              run as `agent.sh --resume ID` it answers the message on stdin in that session
if [ "$1" = "--resume" ]; then
  IFS= read -r message
  echo "{\"type\":\"system\",\"subtype\":\"init\",\"session_id\":\"$2\"}"
  echo "{\"type\":\"result\",\"subtype\":\"success\",\"result\":\"resumed $2: $message\",\"total_cost_usd\":0.5,\"usage\":{\"input_tokens\":3,\"output_tokens\":2}}"
  exit 0
fi
IFS= read -r prompt
echo "agent: job ${JOB_ID} iteration ${ITERATION} prompt: ${prompt}"
case " $prompt " in *" echo "*)
  while IFS= read -r line; do echo "echo: $line"; done
  echo "agent: input closed"
  case " $prompt " in *" exitcode3 "*) exit 3 ;; esac
  exit 0 ;;
esac
case " $prompt " in *" env "*) env | sort | sed 's/^/env: /' ;; esac
case " $prompt " in *" write "*)
  mkdir -p kiln
  { printf '%s\n' "$prompt"; cat; } > "kiln/iteration-${ITERATION}.txt"
  echo "agent: wrote kiln/iteration-${ITERATION}.txt" ;;
esac
case " $prompt " in *" json "*)
  echo '{"type":"system","subtype":"init","session_id":"s1"}'
  echo '{"type":"assistant","message":{"content":[{"type":"text","text":"working on it"}]}}'
  echo 'not json at all'
  echo '{"type":"result","subtype":"success","result":"all good"}' ;;
esac
case " $prompt " in *" turns "*)
  echo "{\"type\":\"system\",\"subtype\":\"init\",\"session_id\":\"sess-${JOB_ID}\"}"
  echo '{"type":"result","subtype":"success","result":"first turn done","total_cost_usd":0.25,"usage":{"input_tokens":10,"output_tokens":5}}' ;;
esac
case " $prompt " in *" hang "*)
  echo $$ > "/tmp/kiln-hang-${JOB_ID}.pid"
  sleep 1000 &
  echo $! > "/tmp/kiln-hang-${JOB_ID}.child"
  while :; do sleep 1; echo "agent: still working"; done ;;
esac
case " $prompt " in *" slow "*) sleep 1 ;; esac
case " $prompt " in *" big "*)
  mkdir -p kiln && head -c 3145728 /dev/zero > kiln/big.bin && echo "agent: wrote 3 MiB" ;;
esac
case " $prompt " in *" flood "*)
  head -c 31457280 /dev/zero | tr '\0' 'x'; echo
  yes "agent: flood $(printf '%080d' 0)" | head -c 31457280; echo
  echo "agent: flood done" ;;
esac
case " $prompt " in *" flaky "*)
  marker="/tmp/kiln-flaky-${JOB_ID}-${ITERATION}"
  if [ ! -f "$marker" ]; then touch "$marker"; echo "agent: flaky failure" >&2; exit 1; fi ;;
esac
for word in $prompt; do
  case "$word" in promise@*)
    n=${word#promise@}
    if [ "$ITERATION" -ge "$n" ]; then echo "agent: done ${COMPLETION_PROMISE}"; fi ;;
  esac
done
case " $prompt " in *" fail "*) echo "agent: about to fail"; echo "agent: simulated crash" >&2; exit 1 ;; esac
exit 0
