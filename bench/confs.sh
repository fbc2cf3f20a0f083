# shellcheck shell=bash
# The configurations the benchmarks share, sourced by compare.sh, ab.sh and
# latency.sh so that they measure the same upstream, the same nginx and the
# same pandagate settings.
#
#   nginx_upstream_conf DIR PORT WORKERS NOFILE [CERT KEY STATUS_PORT]  > DIR/nginx.conf
#   nginx_proxy_conf DIR PORT UPSTREAM_PORT NOFILE [LOG_OPTS] [CA_FILE] [KEEPALIVE]
#                                                   > DIR/nginx.conf
#   nginx_lua_proxy_conf DIR PORT UPSTREAM_PORT NOFILE [LOG_OPTS] [CA_FILE] [KEEPALIVE]
#                        [ACCESS_KEY SECRET USER_ID]  > DIR/nginx.conf (the peer)
#   need_nginx_lua            installs libnginx-mod-http-lua when missing
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

# The upstream pool (KEEPALIVE idle connections per worker, never closed
# for their count or age during a run) and the opening of the server block
# listening on PORT, as both proxies have them.
nginx_pool_and_listener() {
  local up_port=$1 keepalive=$2 port=$3
  cat <<CONF
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
CONF
}

# The proxy_ssl lines of a proxy that reaches its upstream over TLS,
# trusting CA_FILE (see nginx_proxy_conf); a leading newline included.
nginx_upstream_tls() {
  local ca_file=$1
  printf '\n      %s' \
    "proxy_ssl_trusted_certificate $ca_file;" \
    "proxy_ssl_verify on;" \
    "proxy_ssl_verify_depth 2;" \
    "proxy_ssl_protocols TLSv1.2 TLSv1.3;" \
    "proxy_ssl_name localhost;" \
    "proxy_ssl_server_name on;" \
    "proxy_ssl_session_reuse on;"
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
    tls=$(nginx_upstream_tls "$ca_file")
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
$(nginx_pool_and_listener "$up_port" "$keepalive" "$port")
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

# Where Debian's nginx modules are (libnginx-mod-http-lua and the
# libnginx-mod-http-ndk it depends on): /usr/lib/nginx/modules.
NGINX_MODULES_DIR=/usr/lib/nginx/modules

# The Lua module the peer needs, from Debian when missing (with its
# dependencies: the NDK module, LuaJIT, lua-resty-core). Needs lib.sh.
need_nginx_lua() {
  need_file "$NGINX_MODULES_DIR/ngx_http_lua_module.so" libnginx-mod-http-lua
  [ -e "$NGINX_MODULES_DIR/ndk_http_module.so" ] \
    || die "libnginx-mod-http-lua is installed but $NGINX_MODULES_DIR/ndk_http_module.so is missing"
}

# The peer: what a platform team builds instead of adopting pandagate. The
# nginx reverse proxy above, line for line (workers, pool, TLS settings,
# keep-alive, the JSON access log and LOG_OPTS), plus OpenResty's Lua module
# doing per call what the gateway's signing and envelope logging do:
#   - access phase: a millisecond timestamp (ngx.now()), a 32-character
#     nonce of letters and digits (math.random, seeded per worker), and the
#     signature UPPER(MD5(access-key + timestamp + nonce-str + secret))
#     (ngx.md5, upper-cased), into variables that proxy_set_header sends as
#     the timestamp, nonce-str and signature headers; access-key and user-id
#     are fixed headers, as in the static row;
#   - body filter, on the answer's first chunk: requestId and code read with
#     string.match into ngx.ctx and into $pp_request_id / $pp_code, which
#     the access log line (the static row's fields plus request_id and code)
#     writes.
# ACCESS_KEY, SECRET, USER_ID default to the bench credentials pandagate is
# given (bench-key, bench-secret, bench-user). The modules are loaded by
# absolute path: the proxy runs with its own prefix (-p DIR).
nginx_lua_proxy_conf() {
  local dir=$1 port=$2 up_port=$3 nofile=$4 log_opts=${5:-} ca_file=${6:-} keepalive=${7:-64}
  local key=${8:-bench-key} secret=${9:-bench-secret} user=${10:-bench-user}
  local v
  for v in "$key" "$secret" "$user"; do
    # Written into the config as Lua and nginx strings: nothing to escape.
    [[ $v =~ ^[A-Za-z0-9._-]+$ ]] || { echo "nginx_lua_proxy_conf: credential with odd characters: $v" >&2; return 1; }
  done
  local scheme=http tls=""
  if [ -n "$ca_file" ]; then
    scheme=https
    tls=$(nginx_upstream_tls "$ca_file")
  fi
  cat <<CONF
load_module $NGINX_MODULES_DIR/ndk_http_module.so;
load_module $NGINX_MODULES_DIR/ngx_http_lua_module.so;
worker_processes auto;
worker_rlimit_nofile $nofile;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 8192; }
http {
$(nginx_temp_paths "$dir")
  log_format peerjson escape=json '{"ts":"\$time_iso8601","nginx_request_id":"\$request_id","status":\$status,'
    '"upstream_status":"\$upstream_status","method":"\$request_method","uri":"\$request_uri",'
    '"request_time":\$request_time,"upstream_response_time":"\$upstream_response_time",'
    '"request_id":"\$pp_request_id","code":"\$pp_code"}';
  access_log $dir/access.log peerjson$log_opts;

  # The signing module, loaded once per worker: require "pandapon" is a
  # table lookup per call.
  init_by_lua_block {
    local md5, upper, char, floor, random, now = ngx.md5, string.upper, string.char, math.floor, math.random, ngx.now
    local KEY, SECRET = "$key", "$secret"
    local ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    local alnum = {}
    local N = #ALNUM
    for i = 1, N do alnum[i] = ALNUM:byte(i) end
    local buf = {}
    package.loaded.pandapon = {
      -- timestamp (ms), nonce-str, signature for one call
      sign = function()
        local ts = tostring(floor(now() * 1000 + 0.5))
        for i = 1, 32 do buf[i] = alnum[random(N)] end
        local nonce = char(unpack(buf))
        return ts, nonce, upper(md5(KEY .. ts .. nonce .. SECRET))
      end,
    }
  }
  # Each worker draws other nonces.
  init_worker_by_lua_block {
    math.randomseed(ngx.now() * 1000 + ngx.worker.pid())
  }

$(nginx_pool_and_listener "$up_port" "$keepalive" "$port")
    location / {
      set \$pp_timestamp '';
      set \$pp_nonce '';
      set \$pp_signature '';
      set \$pp_request_id '';
      set \$pp_code '';
      access_by_lua_block {
        local ts, nonce, sig = require("pandapon").sign()
        local var = ngx.var
        var.pp_timestamp, var.pp_nonce, var.pp_signature = ts, nonce, sig
      }
      body_filter_by_lua_block {
        local ctx = ngx.ctx
        if not ctx.seen then
          local chunk = ngx.arg[1]
          if chunk ~= "" then
            ctx.seen = true
            ctx.request_id = chunk:match('"requestId"%s*:%s*"([^"]*)"')
            ctx.code = chunk:match('"code"%s*:%s*"?([^",}%s]*)')
            ngx.var.pp_request_id = ctx.request_id or ""
            ngx.var.pp_code = ctx.code or ""
          end
        end
      }
      proxy_pass $scheme://provider;$tls
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header access-key $key;
      proxy_set_header user-id $user;
      proxy_set_header signature \$pp_signature;
      proxy_set_header timestamp \$pp_timestamp;
      proxy_set_header nonce-str \$pp_nonce;
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
