#!/usr/bin/env bash
# Makes the base image the Dockerfile names (debian:12) from Debian packages,
# for a machine whose Docker engine cannot pull images:
#   debootstrap --variant=minbase bookworm from the machine's own Debian
#   mirror (the one in /etc/apt/sources.list or /etc/apt/sources.list.d/,
#   one-line or deb822 format), then `docker import` under the tag.
# The image gets an apt sources list for that mirror (bookworm and, where
# the machine has them, bookworm-updates and bookworm-security), the
# machine's own apt settings for reaching it (apt.conf.d files that no
# package owns and that set Acquire:: options, e.g. Check-Valid-Until for a
# snapshot mirror), and the certificate authorities the machine trusts
# beyond Debian's (e.g. a site proxy's), so that apt and pip inside
# `docker build --network host` reach what the machine reaches.
#
#   bash scripts/docker_base_image.sh [TAG]   # default: the Dockerfile's FROM
#
# Does nothing when TAG exists. Needs root, debootstrap and a running Docker
# engine. Elsewhere `docker build` pulls debian:12 as usual.
set -euo pipefail
cd "$(dirname "$0")/.."
DOCKER=${DOCKER:-docker}
SUITE=${DEBIAN_SUITE:-bookworm}

tag=${1:-}
if [[ -z $tag ]]; then
  # The images the stages start from, less the stages themselves.
  mapfile -t bases < <(awk '
    toupper($1) == "FROM" {
      img = ""; for (i = 2; i <= NF; i++) if ($i !~ /^--/) { img = $i; break }
      from[img] = 1
      for (i = 2; i < NF; i++) if (toupper($i) == "AS") stage[$(i + 1)] = 1
    }
    END { for (f in from) if (!(f in stage)) print f }' Dockerfile)
  if [[ ${#bases[@]} -ne 1 ]]; then
    echo "docker_base_image: the Dockerfile starts from ${#bases[@]} images (${bases[*]}); name the tag" >&2
    exit 2
  fi
  tag=${bases[0]}
fi

if "$DOCKER" image inspect "$tag" > /dev/null 2>&1; then
  echo "docker_base_image: $tag present"
  exit 0
fi
command -v debootstrap > /dev/null || {
  echo "docker_base_image: debootstrap is missing (apt-get install debootstrap)" >&2
  exit 1
}

# The machine's apt sources as "URI SUITE COMPONENT..." lines: enabled deb
# entries of one-line .list files and deb822 .sources files.
sources() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    # deb [options] URI SUITE COMPONENT...
    sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" | awk '$1 == "deb" && NF >= 3 {
      line = $2; for (i = 3; i <= NF; i++) line = line " " $i; print line }'
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    awk '
      function flush(   n, u, s, i, j, us, ss) {
        if (types ~ /(^|[ \t])deb([ \t]|$)/ && tolower(enabled) != "no" && uris != "" && suites != "") {
          n = split(uris, us, /[ \t]+/); m = split(suites, ss, /[ \t]+/)
          for (i = 1; i <= n; i++) for (j = 1; j <= m; j++) if (us[i] != "" && ss[j] != "")
            print us[i], ss[j], comps
        }
        types = uris = suites = comps = ""; enabled = "yes"; key = ""
      }
      BEGIN { enabled = "yes" }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      /^[ \t]/ { next }   # continuation lines (e.g. an inline Signed-By key)
      {
        key = tolower($1); sub(/:$/, "", key)
        val = $0; sub(/^[^:]*:[ \t]*/, "", val)
        if (key == "types") types = val
        else if (key == "uris") uris = val
        else if (key == "suites") suites = val
        else if (key == "components") comps = val
        else if (key == "enabled") enabled = val
      }
      END { flush() }' "$f"
  done
}
mapfile -t entries < <(sources | awk -v s="$SUITE" '$2 ~ "^" s "(-updates|-security|/updates)?$"')
mirror=$(printf '%s\n' "${entries[@]}" | awk -v s="$SUITE" '$2 == s {print $1; exit}')
if [[ -z $mirror ]]; then
  echo "docker_base_image: no Debian mirror for $SUITE in the machine's apt sources" >&2
  exit 1
fi
echo "docker_base_image: making $tag from $mirror ($SUITE, minbase)"

work=$(mktemp -d "${TMPDIR:-/var/tmp}/zeroq-base-XXXXXX")
root=$work/rootfs
cleanup() {
  # A debootstrap that stopped half-way may leave these mounted.
  local m
  for m in dev/pts proc sys; do
    if mountpoint -q "$root/$m" 2> /dev/null; then umount -l "$root/$m" || true; fi
  done
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT
debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$root" "$mirror" \
  > "$work/debootstrap.log" 2>&1 || {
  tail -n 20 "$work/debootstrap.log" >&2
  exit 1
}

# apt sources: the machine's entries for this release, one stanza per URI.
rm -f "$root/etc/apt/sources.list"
printf '%s\n' "${entries[@]}" | awk '
  { key = $1; comps = ""; for (i = 3; i <= NF; i++) comps = comps (comps ? " " : "") $i
    if (!(key in suites)) { order[++n] = key; comp[key] = comps }
    suites[key] = suites[key] (suites[key] ? " " : "") $2 }
  END { for (i = 1; i <= n; i++) {
          k = order[i]
          printf "%sTypes: deb\nURIs: %s\nSuites: %s\nComponents: %s\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
                 (i > 1 ? "\n" : ""), k, suites[k], (comp[k] ? comp[k] : "main") } }' \
  > "$root/etc/apt/sources.list.d/debian.sources"

# The machine's own apt settings for reaching the mirror.
for f in /etc/apt/apt.conf.d/*; do
  [[ -f $f ]] || continue
  dpkg -S "$f" > /dev/null 2>&1 && continue
  grep -q '^[[:space:]]*Acquire' "$f" && cp "$f" "$root/etc/apt/apt.conf.d/"
done

# Certificate authorities the machine trusts that Debian's bundle lacks.
host_bundle=/etc/ssl/certs/ca-certificates.crt
if [[ -f $host_bundle ]]; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  awk -v dir="$root/usr/local/share/ca-certificates" '
    FNR == 1 { file++ }
    /-----BEGIN CERTIFICATE-----/ { pem = "" }
    { pem = pem $0 "\n" }
    /-----END CERTIFICATE-----/ {
      if (file == 1) known[pem] = 1
      else if (!(pem in known)) { n++; printf "%s", pem > (dir "/machine-" n ".crt") }
    }
    END { print n + 0 }' "$root/etc/ssl/certs/ca-certificates.crt" "$host_bundle" \
    > "$work/added"
  added=$(cat "$work/added")
  if [[ $added -gt 0 ]]; then
    echo "docker_base_image: adding $added certificate authorities the machine trusts"
    out=$(chroot "$root" update-ca-certificates 2>&1) || { echo "$out" >&2; exit 1; }
  fi
fi

# Leave no caches, package lists or host identity behind.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
       "$root"/tmp/* "$root"/var/tmp/*
find "$root/var/log" -type f -delete
: > "$root/etc/hostname"
rm -f "$root/etc/resolv.conf"

tar --numeric-owner -C "$root" -c . |
  "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    - "$tag" > /dev/null
echo "docker_base_image: $tag made ($("$DOCKER" image inspect --format '{{.Size}}' "$tag") bytes)"
