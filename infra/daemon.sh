# Sourced by the infra scripts. A daemon must not inherit the caller's open files: started under
# `flock LOCK make up`, it would hold LOCK for as long as it runs.
close_inherited_fds() {
  local fd
  for fd in /proc/"$BASHPID"/fd/*; do
    fd="${fd##*/}"
    [[ "$fd" =~ ^[0-9]+$ && "$fd" -gt 2 ]] && eval "exec $fd>&-" 2>/dev/null || true
  done
}
