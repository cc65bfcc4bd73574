# Source this file: preloads OpenBLAS on Linux when it is installed (see scripts/setup.sh).
for lib in /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0; do
  if [ -e "$lib" ]; then
    case ":${LD_PRELOAD:-}:" in *":$lib:"*) ;; *) export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}";; esac
    break
  fi
done
