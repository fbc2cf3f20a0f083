# shellcheck shell=bash
# The configurations the benchmarks share, sourced by compare.sh, ab.sh and
# latency.sh so that they measure the same upstream, the same nginx and the
# same pandagate settings.
#
#   nginx_upstream_conf DIR PORT WORKERS NOFILE     > DIR/nginx.conf
#   nginx_proxy_conf DIR PORT UPSTREAM_PORT NOFILE [LOG_OPTS]   > DIR/nginx.conf
#   pandagate_bench_conf      > pandagate.toml

# What the provider stand-in answers to every call.
BENCH_ENVELOPE='{"requestId":"4cfda0b725184ab8a1e3ee3b9051ec35","code":200,"developId":"1014533973088404335","msg":"ok","data":{}}'

# nginx otherwise wants its compiled-in /var/lib/nginx paths.
nginx_temp_paths() {
  local d=$1
  printf '  client_body_temp_path %s/tmp-body;\n  proxy_temp_path %s/tmp-proxy;\n' "$d" "$d"
  printf '  fastcgi_temp_path %s/tmp-fcgi;\n  uwsgi_temp_path %s/tmp-uwsgi;\n  scgi_temp_path %s/tmp-scgi;\n' "$d" "$d" "$d"
}

# The provider stand-in: the same fixed envelope for every call, as cheap as
# nginx can make it, so that it is not what limits the proxies.
nginx_upstream_conf() {
  local dir=$1 port=$2 workers=$3 nofile=$4
  cat <<CONF
worker_processes $workers;
worker_rlimit_nofile $nofile;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
$(nginx_temp_paths "$dir")
  server {
    listen 127.0.0.1:$port backlog=4096;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    location / {
      default_type application/json;
      return 200 '$BENCH_ENVELOPE';
    }
    # Echoes the credential headers a proxy added: checked once before the load.
    location = /open/bench/headers {
      default_type text/plain;
      return 200 'access-key=\$http_access_key user-id=\$http_user_id signature=\$http_signature timestamp=\$http_timestamp nonce-str=\$http_nonce_str\n';
    }
  }
}
CONF
}

# A plain, production-like nginx reverse proxy doing what the gateway does
# minus the signature computation: fixed credential headers, per-request
# timestamp/nonce from nginx variables, pooled upstream connections, an
# access log line per call (LOG_OPTS, e.g. " buffer=64k flush=1s").
nginx_proxy_conf() {
  local dir=$1 port=$2 up_port=$3 nofile=$4 log_opts=${5:-}
  cat <<CONF
worker_processes auto;
worker_rlimit_nofile $nofile;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 8192; }
http {
$(nginx_temp_paths "$dir")
  log_format benchjson escape=json '{"ts":"\$time_iso8601","nginx_request_id":"\$request_id","status":\$status,'
    '"upstream_status":"\$upstream_status","method":"\$request_method","uri":"\$request_uri",'
    '"request_time":\$request_time,"upstream_response_time":"\$upstream_response_time"}';
  access_log $dir/access.log benchjson$log_opts;
  upstream provider {
    server 127.0.0.1:$up_port;
    keepalive 64;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
  }
  server {
    listen 127.0.0.1:$port backlog=4096;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    location / {
      proxy_pass http://provider;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header access-key bench-key;
      proxy_set_header user-id bench-user;
      proxy_set_header signature 0123456789abcdef0123456789abcdef;
      proxy_set_header timestamp \$msec;
      proxy_set_header nonce-str \$request_id;
    }
  }
}
CONF
}

# pandagate's config for load runs; the listen address, upstream, credentials
# and log format come from the environment.
pandagate_bench_conf() {
  cat <<'CONF'
[server]
# Nothing is in flight when the harness stops it: no need to wait.
shutdown_grace_ms = 1000

# Far above what the load generator can send: its cost is paid, it never binds.
[rate_limit]
requests_per_second = 1000000
burst = 1000000
backend = "local"
CONF
}
