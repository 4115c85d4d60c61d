# Sourced by the fetch scripts: check_sha256 FILE EXPECTED stops the script unless FILE's sha256
# is EXPECTED; sha256_of FILE prints it.
sha256_of() { sha256sum "$1" | cut -d' ' -f1; }
check_sha256() {
  local actual
  actual="$(sha256_of "$1")"
  if [ "$actual" != "$2" ]; then
    echo "error: $1 has sha256 $actual, expected $2; refusing to use it" >&2
    exit 1
  fi
}
