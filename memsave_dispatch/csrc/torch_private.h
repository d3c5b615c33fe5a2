// Reading a private member of one of torch's classes: an explicit template instantiation may
// name it (the standard exempts it from access checks). The member is named, not its offset, so
// a release that renames or retypes it fails to build (and the Python engine runs), never
// reads the wrong bytes. Each member is exposed in exactly one translation unit.
#pragma once

namespace memsave {

template <typename Tag, typename Tag::type Member>
struct Expose {
  friend typename Tag::type get(Tag) { return Member; }
};

// MEMSAVE_EXPOSE(Tag, Class, member, Type), in namespace memsave: `object.*get(Tag())` is
// `object.member`.
#define MEMSAVE_EXPOSE(Tag, Class, member, Type) \
  struct Tag {                                   \
    using type = Type Class::*;                  \
    friend type get(Tag);                        \
  };                                             \
  template struct Expose<Tag, &Class::member>

}  // namespace memsave
