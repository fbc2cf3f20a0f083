# shellcheck shell=bash
# The configurations the benchmarks share, sourced by compare.sh, ab.sh and
# latency.sh so that they measure the same upstream, the same nginx and the
# same pandagate settings.
#
#   nginx_upstream_conf DIR PORT WORKERS NOFILE [CERT KEY STATUS_PORT]  > DIR/nginx.conf
#   nginx_proxy_conf DIR PORT UPSTREAM_PORT NOFILE [LOG_OPTS] [CA_FILE] [KEEPALIVE]
#                                                   > DIR/nginx.conf
#   pandagate_bench_conf [CA_FILE]                  > pandagate.toml
#   make_test_certs DIR       DIR/ca.pem, DIR/server.pem, DIR/server.key (openssl)
#
# With CERT/KEY the upstream serves TLS and logs one line per connection;
# with CA_FILE the nginx proxy and pandagate reach it over TLS, trusting
# that CA. Without them, everything is plain HTTP as before.

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
#
# With CERT and KEY (and STATUS_PORT) it is a TLS provider stand-in: `listen
# ... ssl`, TLS 1.2 and 1.3, a shared session cache and session tickets (what
# a provider's front end offers, so that a client can resume), plus:
#   - DIR/conns.log, one line per TLS connection, written when its first
#     request ends: `$connection $ssl_session_reused $connection_requests
#     $ssl_protocol $msec` (`r` = a resumed session, `.` = a full handshake);
#   - stub_status on http://127.0.0.1:STATUS_PORT/status (plain HTTP), whose
#     `accepts` counts every connection, those that never sent a request too.
nginx_upstream_conf() {
  local dir=$1 port=$2 workers=$3 nofile=$4 cert=${5:-} key=${6:-} status_port=${7:-}
  local listen_opts="" tls="" status="" log="  access_log off;"
  if [ -n "$cert" ]; then
    listen_opts=" ssl"
    tls="
    ssl_certificate $cert;
    ssl_certificate_key $key;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:10m;
    ssl_session_timeout 1h;
    ssl_session_tickets on;
    access_log $dir/conns.log conns if=\$first_on_connection;"
    log="  map \$connection_requests \$first_on_connection { 1 1; default 0; }
  log_format conns '\$connection \$ssl_session_reused \$connection_requests \$ssl_protocol \$msec';
  access_log off;"
    status="
  server {
    listen 127.0.0.1:$status_port;
    access_log off;
    location = /status { stub_status; }
  }"
  fi
  cat <<CONF
worker_processes $workers;
worker_rlimit_nofile $nofile;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 8192; }
http {
$log
$(nginx_temp_paths "$dir")
  server {
    listen 127.0.0.1:$port$listen_opts backlog=4096;$tls
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
  }$status
}
CONF
}

# A plain, production-like nginx reverse proxy doing what the gateway does
# minus the signature computation: fixed credential headers, per-request
# timestamp/nonce from nginx variables, pooled upstream connections, an
# access log line per call (LOG_OPTS, e.g. " buffer=64k flush=1s").
#
# With CA_FILE it reaches the upstream over TLS the way a production nginx
# would: verifying the certificate against CA_FILE for the name localhost
# (sent as SNI too), TLS 1.2 and 1.3 (nginx 1.22's default leaves 1.3 out
# of proxy_ssl_protocols; pandagate offers both), reusing TLS sessions
# (`proxy_ssl_session_reuse on`, nginx's default, spelled out) and pooled
# connections. KEEPALIVE: idle upstream connections kept per worker
# (default 64).
nginx_proxy_conf() {
  local dir=$1 port=$2 up_port=$3 nofile=$4 log_opts=${5:-} ca_file=${6:-} keepalive=${7:-64}
  local scheme=http tls=""
  if [ -n "$ca_file" ]; then
    scheme=https
    tls="
      proxy_ssl_trusted_certificate $ca_file;
      proxy_ssl_verify on;
      proxy_ssl_verify_depth 2;
      proxy_ssl_protocols TLSv1.2 TLSv1.3;
      proxy_ssl_name localhost;
      proxy_ssl_server_name on;
      proxy_ssl_session_reuse on;"
  fi
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
    keepalive $keepalive;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
  }
  server {
    listen 127.0.0.1:$port backlog=4096;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    location / {
      proxy_pass $scheme://provider;$tls
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
# and log format come from the environment. With CA_FILE, `[tls] ca_file`
# trusts that CA (the upstream's test certificate) besides the public roots.
pandagate_bench_conf() {
  local ca_file=${1:-}
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
  [ -z "$ca_file" ] || printf '\n[tls]\nca_file = "%s"\n' "$ca_file"
}

# Test certificates, made at run time in DIR (never committed): a CA
# (DIR/ca.pem) and a server certificate for DNS:localhost and IP:127.0.0.1
# signed by it (DIR/server.pem, key DIR/server.key), ECDSA P-256, valid 2
# days. Needs openssl.
make_test_certs() {
  local d=$1
  mkdir -p "$d"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=pandagate bench CA" -keyout "$d/ca.key" -out "$d/ca.pem" 2>"$d/openssl.err" || return 1
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=localhost" -keyout "$d/server.key" -out "$d/server.csr" 2>>"$d/openssl.err" || return 1
  printf '%s\n' 'subjectAltName=DNS:localhost,IP:127.0.0.1' 'basicConstraints=critical,CA:FALSE' \
    'keyUsage=critical,digitalSignature' 'extendedKeyUsage=serverAuth' > "$d/server.ext"
  openssl x509 -req -in "$d/server.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
    -days 2 -extfile "$d/server.ext" -out "$d/server.pem" 2>>"$d/openssl.err" || return 1
  chmod 600 "$d/ca.key" "$d/server.key"
}
