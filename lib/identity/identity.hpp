// A user's long-term identity: the Ed25519 key pair, its key file, its fingerprint.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <string_view>

#include "protocol/messages.hpp"

namespace chat::identity {

/// The 32-byte Ed25519 seed a key pair is derived from; all a key file holds.
using Seed = std::array<std::uint8_t, 32>;
/// An X25519 key (public or secret), for crypto_box.
using BoxKey = std::array<std::uint8_t, 32>;

/// A problem with an identity or its files; what() is a full sentence to show the user as it is.
class IdentityError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Initializes libsodium once; later calls return at once. Throws IdentityError if it cannot.
void init();

/// An Ed25519 key pair and its X25519 pair; movable, not copyable, wiped when it goes (moved-from: all zeros).
class Identity {
 public:
  /// A new random identity.
  static Identity generate();
  /// The identity of `seed`: the same seed always gives the same keys (simulations, key files).
  static Identity from_seed(const Seed& seed);

  Identity(Identity&& other) noexcept;
  Identity& operator=(Identity&& other) noexcept;
  Identity(const Identity&) = delete;
  Identity& operator=(const Identity&) = delete;
  ~Identity();

  /// The Ed25519 public key: what the server binds the name to and peers pin.
  const protocol::Key& public_key() const noexcept { return public_key_; }
  /// The seed, to be saved in a key file; secret.
  const Seed& seed() const noexcept { return seed_; }
  /// The X25519 public key (crypto_sign_ed25519_pk_to_curve25519 of public_key()).
  const BoxKey& box_public_key() const noexcept { return box_public_; }
  /// The X25519 secret key (crypto_sign_ed25519_sk_to_curve25519); secret.
  const BoxKey& box_secret_key() const noexcept { return box_secret_; }
  /// The Ed25519 signature of `msg` by this identity.
  protocol::Signature sign(std::string_view msg) const;

 private:
  Identity() = default;
  void wipe() noexcept;

  Seed seed_{};
  protocol::Key public_key_{};
  std::array<std::uint8_t, 64> secret_key_{};  // libsodium's Ed25519 secret key: seed || public key
  BoxKey box_public_{};
  BoxKey box_secret_{};
};

/// Whether `sig` is `key`'s signature of `msg`; false (never throws) for a key that is not a valid point.
bool verify(const protocol::Key& key, std::string_view msg, const protocol::Signature& sig) noexcept;

/// True if `key` is an Ed25519 public key messages can be sealed to (it converts to X25519);
/// a key a server hands out that is not one is never pinned. Never throws.
bool usable(const protocol::Key& key) noexcept;

/// The key's fingerprint to compare by voice or on paper: 6 groups of 5 digits ("01234 56789 ...").
std::string fingerprint(const protocol::Key& key);

/// $XDG_DATA_HOME if set and absolute, else $HOME/.local/share; throws IdentityError if neither is usable.
std::filesystem::path data_home();
/// Where the identity of local name `name` is kept: data_home()/chatapp/identities/<name>.key.
std::filesystem::path default_identity_path(std::string_view name);
/// Where the peer state of local name `name` is kept: data_home()/chatapp/peers/<name>.db.
std::filesystem::path default_state_path(std::string_view name);

/// Creates `dir` and missing parents 0700; existing ones at or below "chatapp" must be ours and 0700 (else IdentityError).
void make_private_dirs(const std::filesystem::path& dir);

/// The identity in `file`, created if missing (*created says so); never overwrites; refuses unsafe or bad files (IdentityError).
Identity load_or_create(const std::filesystem::path& file, bool* created = nullptr);

}  // namespace chat::identity
